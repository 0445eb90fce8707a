"""Runners for other engines, started in their own environments by tessera.bench.compare (they never
import tessera)."""
