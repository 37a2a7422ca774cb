"""Data: BraTS layout reading and validation, preprocessing, the phantom dataset and `tsgm prepare`."""
