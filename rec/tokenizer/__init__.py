"""rec.tokenizer"""
