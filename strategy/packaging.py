"""What a client downloads for one assignment.

The assigned block goes dense; everything else goes in `"frozen"`. The Arrays are the global
record's own objects, so nothing is re-serialized. Compression of the frozen part and per-node
deduplication slot in here.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, RecordDict

from fedcybgd.blocks import Block
from fedcybgd.protocol import BLOCK, CONFIG, FROZEN, TrainInstruction


def train_content(global_arrays: ArrayRecord, block: Block, instruction: TrainInstruction) -> RecordDict:
    in_block = set(block.names)
    return RecordDict({
        BLOCK: ArrayRecord({name: global_arrays[name] for name in block.names}),
        FROZEN: ArrayRecord({name: array for name, array in global_arrays.items() if name not in in_block}),
        CONFIG: instruction.to_record(),
    })
