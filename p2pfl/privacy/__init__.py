"""Node-level differential privacy (docs/privacy.md).

`mechanism` clips a round's update and adds Gaussian noise (numpy); `accountant` wraps
Google's `dp-accounting` (the optional extra `p2pfl[dp]`, imported only when used);
`budget` is the sans-IO spent/remaining/exhausted state; `node` ties them to a node and
keeps the spent budget on disk across restarts.
"""

from p2pfl.privacy.budget import BudgetExhausted, PrivacyBudget
from p2pfl.privacy.mechanism import Release, clip_update, gaussian_release

__all__ = ["BudgetExhausted", "PrivacyBudget", "Release", "clip_update", "gaussian_release"]
