"""How the defended models are made and measured: training (plain, Gaussian augmentation, PGD, CROWN-IBP) and the model
zoo's evaluation.
"""
