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
BATCH_SIZE: Final = "batch-size"
NUM_ROUNDS: Final = "num-rounds"  # rounds the study plans in total (sites calibrate DP noise on it)
MODEL_SPEC: Final = "model-spec"  # models.ModelSpec as JSON
TASK: Final = "task"
NUM_CLASSES: Final = "num-classes"
INPUT_SHAPE: Final = "input-shape"  # list of int: one example's shape
HAS_MASK: Final = "has-mask"

# error replies a site sends instead of training / evaluating: Message(Error(code, reason))
ERROR_DATA_INVALID: Final = 1001  # manifest or data failed validation, or does not fit the model
ERROR_BUDGET_SPENT: Final = 1002  # the site's privacy budget for this study is spent
ERROR_LEDGER: Final = 1003  # the site's privacy ledger is unusable (locked, corrupt, mismatched)
REFUSAL_FORMAT: Final = "site '{site}' refused to {stage}: {reason}"  # Error.reason of both
