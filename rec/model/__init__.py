"""rec.model"""
