"""rec.data"""
