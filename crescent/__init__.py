"""crescent: a Mooncake-style, KVCache-centric, disaggregated LLM serving platform."""
__version__ = "0.1.0"
