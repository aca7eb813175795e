"""fal\x27s own API surface (SPEC section 11): routes, id mapping, fal-shaped errors."""
