//! Builder-style `with_*` setters for configuration structs.

/// Generates `pub fn with_x(mut self, x: T) -> Self` methods, one per
/// `with_x: field: Type` entry, for the `new(required) + with_*` configuration style.
///
/// ```
/// #[derive(Default)]
/// struct Config {
///     width: usize,
/// }
/// impl Config {
///     flow_core::with_setters! { with_width: width: usize }
/// }
/// assert_eq!(Config::default().with_width(3).width, 3);
/// ```
#[macro_export]
macro_rules! with_setters {
    ($($name:ident: $field:ident: $ty:ty),* $(,)?) => {
        $(
            #[doc = concat!("Sets `", stringify!($field), "`.")]
            pub fn $name(mut self, $field: $ty) -> Self {
                self.$field = $field;
                self
            }
        )*
    };
}
