"""Meta's .pth (a torch.save zip) written tensor by tensor, so a 70B shard never sits in RAM.

torch.save under torch.serialization.skip_data() lays the file out (pickle, record headers, space
for each tensor's bytes) without writing any tensor bytes; we then write each tensor into its
record as it becomes available and finally put each record's CRC-32 into its local and central
zip headers, which leaves an ordinary zip that any torch.load reads.
"""
import os
import struct
import zipfile
import zlib

import torch

from ...errors import SlowLlamaError
from ..files import commit_staged, discard_staged, temporary_beside

LOCAL_HEADER, CENTRAL_HEADER = b'PK\x03\x04', b'PK\x01\x02'


class PthWriter:
    def __init__(self, path, layout):
        """layout: {name: (shape, dtype)}, in the order the tensors are pickled."""
        self.path = path
        fd, self.tmp = temporary_beside(path)
        os.close(fd)
        # never touched, so these cost address space, not memory
        empty = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in layout.items()}
        _save_layout(empty, self.tmp)
        records, self.others = _records(self.tmp)
        if len(records) != len(empty):
            raise RuntimeError(f'{self.tmp}: {len(records)} tensor records for {len(empty)} tensors')
        self.records = dict(zip(empty, records))  # storage keys are numbered in pickling order
        for name, tensor in empty.items():
            if self.records[name]['size'] != tensor.numel() * tensor.element_size():
                raise RuntimeError(f'{self.tmp}: record for {name} has the wrong size')
        self.file = open(self.tmp, 'r+b')
        self.crc = {}

    def write(self, name, tensor):
        record = self.records[name]
        data = tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()
        if data.nbytes != record['size']:
            raise SlowLlamaError(f'{self.path}: {name} has {data.nbytes} bytes, its record {record["size"]}')
        self.file.seek(record['data'])
        self.file.write(memoryview(data))
        self.crc[name] = zlib.crc32(data)

    def close(self):
        missing = [name for name in self.records if name not in self.crc]
        if missing:
            raise SlowLlamaError(f'{self.path}: nothing written for {missing[:3]}')
        for record in self.others:  # the pickle and torch's small records, complete since __init__
            self.file.seek(record['data'])
            self.crc[id(record)] = zlib.crc32(self.file.read(record['size']))
        entries = list(self.records.items()) + [(id(record), record) for record in self.others]
        for key, record in entries:
            crc = struct.pack('<I', self.crc[key])
            self.file.seek(record['local'] + 14)
            self.file.write(crc)
            self.file.seek(record['central'] + 16)
            self.file.write(crc)
        commit_staged(self.file, self.tmp, self.path)

    def abort(self):
        discard_staged(self.file, self.tmp)


def _save_layout(tensors, path):
    from torch.utils.serialization import config
    compute_crc32 = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        with torch.serialization.skip_data():
            torch.save(tensors, path)
    finally:
        config.save.compute_crc32 = compute_crc32


def _records(path):
    """([the 'data/N' tensor records in N order], [the other records]): where each one's bytes start,
    its size, and where its local and central headers are."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        central = archive.start_dir
    with open(path, 'rb') as f:
        found, others = {}, []
        for info in infos:
            f.seek(central)
            header = f.read(46)
            if header[:4] != CENTRAL_HEADER:
                raise RuntimeError(f'{path}: unexpected zip central directory layout')
            name_len, extra_len, comment_len = struct.unpack('<HHH', header[28:34])
            f.seek(info.header_offset)
            local = f.read(30)
            local_name, local_extra = struct.unpack('<HH', local[26:30])
            record = {'data': info.header_offset + 30 + local_name + local_extra, 'size': info.file_size,
                      'local': info.header_offset, 'central': central}
            prefix, _, key = info.filename.rpartition('data/')
            if key.isdigit() and prefix.endswith('/') and not prefix.endswith('.data/'):
                found[int(key)] = record
            else:
                others.append(record)
            central += 46 + name_len + extra_len + comment_len
    return [found[key] for key in sorted(found)], others
