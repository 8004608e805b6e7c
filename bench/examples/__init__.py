"""Small runnable examples (shipped as fusedopt._bench.examples)."""
