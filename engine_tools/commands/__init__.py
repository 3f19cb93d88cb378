"""Sub-commands of ``medquant``; each module defines ``register(subparsers, common)``."""
