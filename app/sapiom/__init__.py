"""The Sapiom control plane (SPEC section 12): Sapiom-wrapped HTTP clients run against falgate."""
