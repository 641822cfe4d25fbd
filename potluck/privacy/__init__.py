"""Privacy: typed-placeholder sanitizer, trust tiers and policy, cloud client and audit."""
