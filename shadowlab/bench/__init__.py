"""Benchmarks: attack step, CERTIFY and bound speed, and the comparison with IBM ART's Shadow Attack.
"""
