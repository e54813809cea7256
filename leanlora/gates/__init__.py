"""The gate maths: hard-concrete gates (arXiv 1712.01312), their priors, and the schedule that
anneals them and sums the priors into the training loss."""
