"""Reproduction of the paper's claims on CIFAR-10 and the teacher-fidelity probe (see README.md)."""
