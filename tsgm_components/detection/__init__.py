"""Detection: the detector (volume → healthy reconstruction → anomaly maps → mask), residual maps, the weighted
ensemble and its calibration, masks and overlays."""
