"""The chain: a subnet's metagraph and hyperparameters, the SDK's weight conversion, set_weights.

``open_chain(url, netuid)`` gives a :class:`Chain` on a real network (through the
Bittensor SDK's websocket client) or on the local simulated subnet (the same SDK code
over a simulated substrate); see docs/chain.md.
"""

from bittensor import Signer
from bittensor.sp_core import Keypair

from platform_common.chain.conversion import plan_chain_weights, within_max_weight_limit
from platform_common.chain.interface import (
    Chain,
    ChainWeights,
    Hyperparameters,
    Metagraph,
    Neuron,
    SubmitOutcome,
    SubmitResult,
    SubnetNotFoundError,
)
from platform_common.chain.local import (
    LocalSubnet,
    SubnetHyperparameters,
    WeightCommit,
    WeightsOnChain,
    dev_keypair,
)
from platform_common.chain.remote import RemoteSubnet
from platform_common.chain.sdk_chain import SdkChain, open_chain, open_local_subnet

__all__ = [
    "Chain",
    "ChainWeights",
    "Hyperparameters",
    "Keypair",
    "LocalSubnet",
    "Metagraph",
    "Neuron",
    "RemoteSubnet",
    "SdkChain",
    "Signer",
    "SubmitOutcome",
    "SubmitResult",
    "SubnetHyperparameters",
    "SubnetNotFoundError",
    "WeightCommit",
    "WeightsOnChain",
    "dev_keypair",
    "open_chain",
    "open_local_subnet",
    "plan_chain_weights",
    "within_max_weight_limit",
]
