"""`clipcid balance` (run.py), the balance folder it writes (artifact.py) and its inspect page (inspect.py)."""

from clipcid.balance.run import BalanceConfig, balance

__all__ = ["BalanceConfig", "balance"]
