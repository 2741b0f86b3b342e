"""Device kernels of swapmoe. Each module that needs Triton imports it at its top: import such a module
only after :func:`swapmoe.fused.triton_available` said yes."""
