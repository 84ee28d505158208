"""Names of the records and fields that travel between the server and the hospital nodes.

Both ``server`` and ``client`` import these; neither imports the other.
"""

from __future__ import annotations

from typing import Final

ARRAYS: Final = "arrays"
METRICS: Final = "metrics"
CONFIG: Final = "config"

# metrics a site returns
NUM_EXAMPLES: Final = "num-examples"
EPSILON: Final = "epsilon"
DELTA: Final = "delta"
SITE: Final = "site"
REFUSED: Final = "refused"
REASON: Final = "reason"

# config the server sends
SERVER_ROUND: Final = "server-round"
LOCAL_EPOCHS: Final = "local-epochs"
LEARNING_RATE: Final = "lr"
PROXIMAL_MU: Final = "proximal-mu"
STUDY: Final = "study"
