"""The allocator-bytes peak the 8B memory bench reports, against a hand-computed sequence."""

import torch

from esa.allocator import tracked_peak

MB = 2**20


def test_peak_of_a_hand_computed_sequence():
    """4 MB and 8 MB held, the 4 MB freed, 2 MB more: the peak is 12 MB, not the 14 MB allocated."""

    def run():
        first = torch.empty(4 * MB, dtype=torch.uint8)
        second = torch.empty(8 * MB, dtype=torch.uint8)
        del first
        third = torch.empty(2 * MB, dtype=torch.uint8)
        return second, third

    peak, seconds = tracked_peak(run)
    assert peak == 12 * MB
    assert seconds > 0
