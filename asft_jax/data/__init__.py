"""Preference data: reading records and turning them into token ids."""
