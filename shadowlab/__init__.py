"""shadowlab: the Shadow Attack (Ghiasi, Shafahi and Goldstein, ICLR 2020) and the certified defenses it breaks,
as a teaching and reproduction kit. The layers, lowest first: the base modules here, then certify, defenses, shadow,
experiments, lab, bench and cli (docs/architecture.md)."""
