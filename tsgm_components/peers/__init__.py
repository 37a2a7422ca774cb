"""Peer methods of the paper's comparison (Table II) and the peers users compare with today: each a
``reconstruct(slices) -> healthy`` for the same detection, calibration and evaluation path as TSGM."""
