"""The ``opensequence`` command: composition only; the work lives in the domain packages."""
