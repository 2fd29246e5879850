"""Meta-training of decision policies across cheap training tasks: the task distribution
(:mod:`rlopt.meta.tasks`) and the trainer behind ``rlopt-train-policy``
(:mod:`rlopt.meta.train_policy`)."""
