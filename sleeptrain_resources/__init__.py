"""Everything that touches a model, a database or a tracker."""
