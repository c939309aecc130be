"""rec.eval"""
