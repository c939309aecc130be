"""rec.decode"""
