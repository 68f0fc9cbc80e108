"""The queue that copies weights to the device beside the compute: one code path for cuda and mps
through torch's device-generic torch.Stream / torch.Event, and a stand-in for the cpu.

On cuda the copies run on a side stream, so block i+1 travels while block i computes. mps has one
command queue (torch gives no second stream there): copies and compute are ordered on it already,
and the gain is that a non-blocking copy from a host buffer filled in the reader thread no longer
commits and waits for the whole queue. On a cpu a copy is a memcpy that is done when it returns:
there is nothing to wait for, and every event is None.

On mps every call on the queue (a copy, an event recorded, waited for or synchronized) must come
from the thread that launches the compute (`one_thread`): MPS encodes commands into one shared
command buffer, and its encoding is not thread-safe (two threads abort with "A command encoder is
already encoding", PyTorch issue 197805). cuda streams may be driven from any thread.
"""
import torch


class CopyQueue:
    def __init__(self, device):
        if device.type != 'cpu' and device.index is None:  # events and streams of one device, from any thread
            device = torch.device(device.type, torch.accelerator.current_device_index())
        self.device = device
        self.synchronous = device.type == 'cpu'
        self.one_thread = device.type == 'mps'  # only the compute thread may touch the queue
        if self.synchronous:
            self.stream = None
        elif device.type == 'cuda':
            self.stream = torch.Stream(device=device)  # a side stream of its own
        else:
            self.stream = torch.accelerator.current_stream(device)  # mps: its one queue

    def after_compute(self):
        """An event at the end of what the compute has queued so far (None on a cpu)."""
        if self.synchronous:
            return None
        event = torch.Event(device=self.device)
        event.record(torch.accelerator.current_stream(self.device))
        return event

    def copy(self, pairs, after=None):
        """Copy each (device target, host source) on the copy stream once `after` has happened;
        -> the event of the copies' end (None on a cpu, where they are done on return). A host
        source must stay untouched until that event: only from pinned memory is the copy really
        asynchronous, from other memory torch waits for it."""
        if self.synchronous:
            for target, source in pairs:
                target.copy_(source)
            return None
        with self.stream:
            if after is not None:
                self.stream.wait_event(after)
            for target, source in pairs:
                target.copy_(source, non_blocking=True)
            done = torch.Event(device=self.device)
            done.record(self.stream)
        return done

    def compute_waits(self, event):
        """The compute queued from now on runs after `event` (the host does not wait)."""
        if event is not None:
            torch.accelerator.current_stream(self.device).wait_event(event)

    @staticmethod
    def host_waits(event):
        if event is not None:
            event.synchronize()
