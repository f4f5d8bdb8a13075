"""Pool designs for models whose layers keep different caches (issue 16): see base.py (the contract)."""
