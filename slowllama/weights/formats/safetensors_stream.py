"""A safetensors file written tensor by tensor: the header is computed from the shapes up front, then
each tensor's bytes are appended as it arrives, so a multi-GB shard never sits in RAM. The file
appears under its final name only once complete (temp name, fsync, rename)."""
import json
import os

import torch

from ...errors import SlowLlamaError
from ..files import SAFETENSORS_DTYPES, commit_staged, discard_staged, temporary_beside

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class SafetensorsStreamWriter:
    def __init__(self, path, layout, metadata=None):
        """layout: {name: (shape, dtype)}; tensors must then be written in this order."""
        self.path = path
        header, offset = {}, 0
        if metadata:
            header['__metadata__'] = metadata
        for name, (shape, dtype) in layout.items():
            size = dtype.itemsize
            for n in shape:
                size *= n
            header[name] = {'dtype': DTYPE_NAMES[dtype], 'shape': list(shape), 'data_offsets': [offset, offset + size]}
            offset += size
        data = json.dumps(header, separators=(',', ':')).encode()
        data += b' ' * (-len(data) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.order, self.sizes = list(layout), {name: header[name]['data_offsets'] for name in layout}
        fd, self.tmp = temporary_beside(path)
        self.file = os.fdopen(fd, 'wb')
        self.file.write(len(data).to_bytes(8, 'little') + data)

    def write(self, name, tensor):
        expected = self.order.pop(0) if self.order else None
        if name != expected:
            raise SlowLlamaError(f'{self.path}: {name} written where {expected} was due')
        data = tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()
        start, end = self.sizes[name]
        if data.nbytes != end - start:
            raise SlowLlamaError(f'{self.path}: {name} has {data.nbytes} bytes, the header says {end - start}')
        self.file.write(memoryview(data))

    def close(self):
        if self.order:
            raise SlowLlamaError(f'{self.path}: nothing written for {self.order[:3]}')
        commit_staged(self.file, self.tmp, self.path)

    def abort(self):
        discard_staged(self.file, self.tmp)
