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
# what a site has spent, per mechanism (train and evaluate replies; privacy.release_mechanisms)
EPSILON_TRAINING: Final = "epsilon-training"  # DP-SGD (the accountant's ε)
EPSILON_COUNT: Final = "epsilon-count"  # the noised example count, released once per study
EPSILON_EVALUATION: Final = "epsilon-evaluation"  # DP evaluations, all together
EPSILON_BUDGET: Final = "epsilon-budget"  # the site's own ε budget for the study (its ledger's); -1: not bound yet
EVALUATION_QUERIES: Final = "evaluation-queries"  # DP evaluations charged in the study
EVALUATION_EXACT_QUERIES: Final = "evaluation-exact-queries"  # exact evaluations (policy opt-in, outside ε)
# the site's ledger in the study (train replies; privacy.ledger.retry_summary): rounds charged, rounds
# voided (never left the site), rounds charged again (retries), and the policy's retry reserve
ROUNDS_CHARGED: Final = "rounds-charged"
ROUNDS_VOIDED: Final = "rounds-voided"
ROUND_RETRIES: Final = "round-retries"
RETRY_RESERVE: Final = "retry-reserve"
# what a training site says about itself (ConfigRecord of the train reply, beside SITE)
MANIFEST_SHA256: Final = "manifest-sha256"  # SHA-256 of the site manifest / data description, never data
ACCOUNTANT: Final = "accountant"  # the site's DP accountant (DP sites only)
MAX_GRAD_NORM: Final = "max-grad-norm"  # the site's DP clipping norm C (DP sites only)
# with EVALUATE_RECEIVED: the received model's evaluation metrics, this prefix + metric name
# (+ NUM_EXAMPLES: the evaluation split's size); a ConfigRecord, so flwr's one-MetricRecord
# reply checks and the training metrics' aggregation never see them
EVALUATED_PREFIX: Final = "evaluated-"
# seconds of local training: sent only by a node that opts in (FEDCARE_REPORT_TIMING=1, benchmarks)
TRAIN_SECONDS: Final = "train-s"

# config the server sends
SERVER_ROUND: Final = "server-round"
LOCAL_EPOCHS: Final = "local-epochs"
LEARNING_RATE: Final = "lr"
PROXIMAL_MU: Final = "proximal-mu"
EVALUATE_RECEIVED: Final = "evaluate-received"  # bool: evaluate the received model before training
# evaluate messages: the split the site releases its statistics of ("test" when absent). "validation":
# the final model's operating threshold (server.operating_point), released and charged exactly as a
# test evaluation (one query of the site's evaluation budget); any other value is refused
EVALUATION_SPLIT: Final = "evaluation-split"
SPLIT_TEST: Final = "test"
SPLIT_VALIDATION: Final = "validation"
EVALUATION_RELEASE: Final = "evaluation-release"  # reply ConfigRecord of a validation query: "dp" or "exact"
CLIP_GRAD_NORM: Final = "clip-grad-norm"  # non-DP training: batch-gradient L2 clipping norm (0: off)
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
ERROR_POLICY: Final = 1004  # the site's own privacy policy refuses the round (or cannot be read)
REFUSAL_FORMAT: Final = "site '{site}' refused to {stage}: {reason}"  # Error.reason of both

# secure-aggregation (SecAgg+) rounds: flwr's legacy fit messages carry a flat config of scalars
PARAM_NAMES: Final = "param-names"  # JSON list of the model's array names, in Parameters order
SECURE_AGGREGATION: Final = "secure-aggregation"  # train metric: 1 when the round went through SecAgg+
ERROR_SECURE_ROUND: Final = 1005  # a SecAgg+ round's message could not be served (names, range)
ERROR_UPDATE_REFUSED: Final = 1006  # the coordinator refused a site's update (server.update_checks)
