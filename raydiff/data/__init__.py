"""Long-tailed dataset builders, Parquet storage and class resampling."""
