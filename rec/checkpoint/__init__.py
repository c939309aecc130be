"""rec.checkpoint"""
