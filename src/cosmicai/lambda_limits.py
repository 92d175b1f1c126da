"""AWS Lambda and Step Functions service limits: the one place they are written down.

Plain constants, imported by the AWS runner (deploy settings, handlers), ``cai aws``, the cost model
(:mod:`cosmicai.analysis.cost`), the simulator and the planner. It imports nothing (no boto3, no cosmicai
module), so the analysis and simulator layers read it without depending on a runner or backend. The AWS
stack's ``template.yaml`` repeats the ranges as CloudFormation parameter bounds; tests/test_import_layers.py checks
that they agree with these.
"""

from __future__ import annotations

#: Configurable Lambda memory (MB). The original CAI state machine ran at the maximum.
MIN_MEMORY_MB = 128
MAX_MEMORY_MB = 10_240

#: Lambda's per-invocation timeout range (seconds); 900 s = 15 minutes is the hard maximum.
MIN_TIMEOUT_S = 1
LAMBDA_TIMEOUT_S = 900

#: Ephemeral storage (``/tmp``, MB): 512 MB is the minimum and comes free; above it is billed.
MIN_EPHEMERAL_MB = 512
MAX_EPHEMERAL_MB = 10_240
FREE_EPHEMERAL_MB = MIN_EPHEMERAL_MB

#: Memory buys CPU: about one vCPU per 1,769 MB, up to 6 vCPUs at :data:`MAX_MEMORY_MB`.
MB_PER_VCPU = 1769.0
MAX_VCPUS = 6.0

#: A Distributed Map runs at most 10,000 child executions at once (its MaxConcurrency cap; 0 = no limit).
MAP_MAX_CHILDREN = 10_000

#: Account-level defaults (Service Quotas can raise them): concurrent executions per region, and burst
#: scaling of ``LAMBDA_BURST_STEP`` more execution environments every ``LAMBDA_BURST_INTERVAL_S`` seconds.
LAMBDA_ACCOUNT_CONCURRENCY = 1000
LAMBDA_BURST_STEP = 1000
LAMBDA_BURST_INTERVAL_S = 10.0
