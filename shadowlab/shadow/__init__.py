"""The Shadow Attack (Ghiasi et al. 2020, eq. 2): settings and result, inputs and seeds, the optimisation loop, the
judges, the two attacks and the authors' released procedure.
"""
