"""Attacks: PGD (training and adversarial accuracy) and the composition-aware attack."""
from ace_lightning.attacks.pgd import (adversarial_correct, counterexample_found, margin_loss, pgd, pgd_minimize,
                                      pgd_pruned)

__all__ = ["adversarial_correct", "counterexample_found", "margin_loss", "pgd", "pgd_minimize", "pgd_pruned"]
