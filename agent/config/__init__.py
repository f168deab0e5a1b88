"""The device profile: YAML read with line numbers, validated once into frozen typed objects."""
