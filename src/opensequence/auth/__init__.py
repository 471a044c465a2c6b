"""Organizations, API keys (hashed, scoped, revocable) and the Bearer dependency."""
