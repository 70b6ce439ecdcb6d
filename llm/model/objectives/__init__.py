"""Objective kinds (the model's `objective` string), one file each: how rows of tokens become inputs and targets,
the loss from the final hidden states, the validation figures and whether the model generates."""
