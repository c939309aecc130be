"""rec.train"""
