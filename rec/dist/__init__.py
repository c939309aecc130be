"""rec.dist"""
