"""noprop_dist: layer-parallel NoProp training on Ray."""
