"""Face recognition training with ECLoss: ``python -m train --config FILE key=value ...``."""
