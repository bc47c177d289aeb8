//! The one list of model families: the names a recipe records, a command line takes
//! and an importer produces.

/// A family of models, as a model's recipe names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Affine couplings (RealNVP).
    RealNvp,
    /// Additive couplings (NICE).
    Nice,
    /// Rational-quadratic spline couplings.
    Nsf,
    /// Autoregressive rational-quadratic splines.
    NsfAr,
    /// Masked autoregressive flow.
    Maf,
    /// Inverse autoregressive flow.
    Iaf,
    /// Glow's multi-scale image flow.
    Glow,
    /// RealNVP's multi-scale image flow.
    RealNvpImage,
    /// Transformer autoregressive flow over image patches.
    TarFlow,
}

impl Family {
    /// Every family.
    pub const ALL: [Family; 9] = [
        Self::RealNvp,
        Self::Nice,
        Self::Nsf,
        Self::NsfAr,
        Self::Maf,
        Self::Iaf,
        Self::Glow,
        Self::RealNvpImage,
        Self::TarFlow,
    ];

    /// The family's name, as recipes record it.
    pub fn name(self) -> &'static str {
        match self {
            Self::RealNvp => "realnvp",
            Self::Nice => "nice",
            Self::Nsf => "nsf",
            Self::NsfAr => "nsf-ar",
            Self::Maf => "maf",
            Self::Iaf => "iaf",
            Self::Glow => "glow",
            Self::RealNvpImage => "realnvp-image",
            Self::TarFlow => "tarflow",
        }
    }

    /// The family named `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// One line on what the family is.
    pub fn summary(self) -> &'static str {
        match self {
            Self::RealNvp => "Affine couplings",
            Self::Nice => "Additive couplings",
            Self::Nsf => "Rational-quadratic spline couplings",
            Self::NsfAr => "Autoregressive rational-quadratic splines",
            Self::Maf => "Masked autoregressive flow",
            Self::Iaf => "Inverse autoregressive flow",
            Self::Glow => "Glow (Kingma & Dhariwal 2018): multi-scale, each step ActNorm, an invertible 1×1 convolution and a convolutional affine coupling (images)",
            Self::RealNvpImage => "RealNVP's multi-scale image architecture (Dinh et al. 2016): checkerboard and channel-wise convolutional couplings with batch norm (images)",
            Self::TarFlow => "TarFlow (Zhai et al. 2024): affine autoregressive blocks over image patches, each conditioned by a causal Transformer (images)",
        }
    }

    /// Whether the family models images (pixel data of a fixed shape).
    pub fn is_image(self) -> bool {
        matches!(self, Self::Glow | Self::RealNvpImage | Self::TarFlow)
    }

    /// Whether the family couples one part of a row to the rest, and so needs at
    /// least two features.
    pub fn couples(self) -> bool {
        matches!(self, Self::RealNvp | Self::Nice | Self::Nsf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_found_by_its_name() {
        for family in Family::ALL {
            assert_eq!(Family::from_name(family.name()), Some(family));
        }
        assert_eq!(Family::from_name("real-nvp"), None);
        let names: Vec<&str> = Family::ALL.map(Family::name).to_vec();
        assert_eq!(
            names,
            [
                "realnvp",
                "nice",
                "nsf",
                "nsf-ar",
                "maf",
                "iaf",
                "glow",
                "realnvp-image",
                "tarflow"
            ]
        );
    }
}
