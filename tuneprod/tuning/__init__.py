"""The search side: the Optuna space, Ray Tune, one trial as a Ray trainable, GPU packing, the results table
and the final stage's members as Ray tasks. The only wing that imports Ray."""
