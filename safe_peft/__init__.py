"""safe_peft"""
