"""soul's version, in a module of its own: code anywhere in soul reads it without importing the `soul`
package's lazy attributes (which import `soul.train`, `soul.models`, `soul.eval`), so no import circle."""

__version__ = "0.1.0"
