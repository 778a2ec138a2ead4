//! Volume chains: ordering an image's volumes by their `PUUID` links, and what makes a chain
//! well-formed. Pure: works on metadata already read.
//!
//! A well-formed chain is linear: exactly one leaf, every parent present in the same image
//! directory, no cycles, no volume with two children, every volume reachable from the leaf.
//! Roles must match positions: the top is LEAF (or SHARED for a template image of one volume),
//! the others INTERNAL, except a template volume — SHARED, always the base — which belongs to
//! another image (its `IMAGE` names the template's image) and is hard-linked here.

use std::collections::{BTreeMap, BTreeSet};

use oxvirt_types::{ImgUuid, VolUuid};
use serde::Serialize;

use crate::volmeta::{Legality, VolRole, VolumeMetadata};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("image {0} has no volumes")]
    Empty(ImgUuid),
    #[error("image {image} has no leaf volume (a cycle?)")]
    NoLeaf { image: ImgUuid },
    #[error("image {image} has several leaf volumes {leaves:?}")]
    ManyLeaves { image: ImgUuid, leaves: Vec<VolUuid> },
    #[error("volume {vol} names parent {parent}, which is not in image {image}")]
    MissingParent {
        image: ImgUuid,
        vol: VolUuid,
        parent: VolUuid,
    },
    #[error("volumes {vols:?} of image {image} are not on the chain from its leaf")]
    Disconnected { image: ImgUuid, vols: Vec<VolUuid> },
}

/// One problem with a structurally sound chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum RoleProblem {
    /// VOLTYPE does not match the volume's position in the chain.
    Role {
        vol: VolUuid,
        found: VolRole,
        expected: VolRole,
    },
    /// A volume from another image that is not a SHARED base.
    ForeignVolume {
        vol: VolUuid,
        image: ImgUuid,
    },
    Illegal {
        vol: VolUuid,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainVolume {
    pub id: VolUuid,
    pub meta: VolumeMetadata,
}

/// An image's volumes, base first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chain {
    pub image: ImgUuid,
    pub volumes: Vec<ChainVolume>,
}

impl Chain {
    pub fn leaf(&self) -> &ChainVolume {
        self.volumes.last().expect("a chain is never empty")
    }
    pub fn base(&self) -> &ChainVolume {
        &self.volumes[0]
    }
    /// The template volume this image was cloned from, if any.
    pub fn template(&self) -> Option<&ChainVolume> {
        let b = self.base();
        (b.meta.image != self.image).then_some(b)
    }
    /// Volumes that belong to this image (the template excluded), base first.
    pub fn own_volumes(&self) -> impl Iterator<Item = &ChainVolume> {
        self.volumes.iter().filter(move |v| v.meta.image == self.image)
    }
    pub fn position(&self, vol: VolUuid) -> Option<usize> {
        self.volumes.iter().position(|v| v.id == vol)
    }
    pub fn get(&self, vol: VolUuid) -> Option<&ChainVolume> {
        self.volumes.iter().find(|v| v.id == vol)
    }
    pub fn child_of(&self, vol: VolUuid) -> Option<&ChainVolume> {
        self.position(vol).and_then(|i| self.volumes.get(i + 1))
    }
    pub fn ids(&self) -> Vec<VolUuid> {
        self.volumes.iter().map(|v| v.id).collect()
    }

    /// Role and legality problems (empty for a healthy chain).
    pub fn problems(&self) -> Vec<RoleProblem> {
        let mut out = Vec::new();
        let n = self.volumes.len();
        for (i, v) in self.volumes.iter().enumerate() {
            let foreign = v.meta.image != self.image;
            if foreign && (i != 0 || v.meta.role != VolRole::Shared) {
                out.push(RoleProblem::ForeignVolume {
                    vol: v.id,
                    image: v.meta.image,
                });
            }
            let expected = if v.meta.role == VolRole::Shared && i == 0 {
                // A template: SHARED at the base, alone in its own image or under a clone.
                VolRole::Shared
            } else if i + 1 == n {
                VolRole::Leaf
            } else {
                VolRole::Internal
            };
            if v.meta.role != expected {
                out.push(RoleProblem::Role {
                    vol: v.id,
                    found: v.meta.role,
                    expected,
                });
            }
            if v.meta.legality != Legality::Legal {
                out.push(RoleProblem::Illegal { vol: v.id });
            }
        }
        out
    }
}

/// Orders `vols` (everything in one image directory) into a chain.
pub fn build_chain(image: ImgUuid, vols: &BTreeMap<VolUuid, VolumeMetadata>) -> Result<Chain, ChainError> {
    if vols.is_empty() {
        return Err(ChainError::Empty(image));
    }
    let parents: BTreeSet<VolUuid> = vols.values().filter_map(|m| m.parent()).collect();
    let leaves: Vec<VolUuid> = vols.keys().filter(|v| !parents.contains(v)).copied().collect();
    let leaf = match leaves.as_slice() {
        [] => return Err(ChainError::NoLeaf { image }),
        [one] => *one,
        _ => return Err(ChainError::ManyLeaves { image, leaves }),
    };
    let mut order = Vec::with_capacity(vols.len());
    let mut seen = BTreeSet::new();
    let mut cur = leaf;
    loop {
        if !seen.insert(cur) {
            break; // cycle: the rest is reported as disconnected
        }
        let meta = &vols[&cur];
        order.push(ChainVolume {
            id: cur,
            meta: meta.clone(),
        });
        match meta.parent() {
            None => break,
            Some(p) if vols.contains_key(&p) => cur = p,
            Some(parent) => {
                return Err(ChainError::MissingParent {
                    image,
                    vol: cur,
                    parent,
                })
            }
        }
    }
    if order.len() != vols.len() {
        return Err(ChainError::Disconnected {
            image,
            vols: vols.keys().filter(|v| !seen.contains(v)).copied().collect(),
        });
    }
    order.reverse();
    Ok(Chain {
        image,
        volumes: order,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volmeta::{Allocation, VolFormat};
    use oxvirt_types::SdUuid;

    fn meta(image: ImgUuid, parent: VolUuid, role: VolRole) -> VolumeMetadata {
        VolumeMetadata {
            domain: SdUuid::nil(),
            image,
            parent,
            capacity: 1 << 30,
            format: VolFormat::Cow,
            allocation: Allocation::Sparse,
            role,
            disktype: "DATA".into(),
            description: String::new(),
            legality: Legality::Legal,
            ctime: 0,
            generation: 0,
            sequence: 0,
        }
    }

    #[test]
    fn orders_base_first_and_finds_template() {
        let img = ImgUuid::new_random();
        let tmpl_img = ImgUuid::new_random();
        let (t, a, b) = (
            VolUuid::new_random(),
            VolUuid::new_random(),
            VolUuid::new_random(),
        );
        let mut vols = BTreeMap::new();
        vols.insert(b, meta(img, a, VolRole::Leaf));
        vols.insert(t, meta(tmpl_img, VolUuid::nil(), VolRole::Shared));
        vols.insert(a, meta(img, t, VolRole::Internal));
        let c = build_chain(img, &vols).unwrap();
        assert_eq!(c.ids(), vec![t, a, b]);
        assert_eq!(c.template().unwrap().id, t);
        assert_eq!(c.own_volumes().count(), 2);
        assert_eq!(c.child_of(a).unwrap().id, b);
        assert!(c.problems().is_empty(), "{:?}", c.problems());
    }

    #[test]
    fn structural_errors() {
        let img = ImgUuid::new_random();
        let (a, b, c) = (
            VolUuid::new_random(),
            VolUuid::new_random(),
            VolUuid::new_random(),
        );
        let mut branch = BTreeMap::new();
        branch.insert(a, meta(img, VolUuid::nil(), VolRole::Internal));
        branch.insert(b, meta(img, a, VolRole::Leaf));
        branch.insert(c, meta(img, a, VolRole::Leaf));
        assert!(matches!(
            build_chain(img, &branch),
            Err(ChainError::ManyLeaves { .. })
        ));

        let mut missing = BTreeMap::new();
        missing.insert(b, meta(img, a, VolRole::Leaf));
        assert_eq!(
            build_chain(img, &missing),
            Err(ChainError::MissingParent {
                image: img,
                vol: b,
                parent: a
            })
        );

        let mut cycle = BTreeMap::new();
        cycle.insert(a, meta(img, b, VolRole::Internal));
        cycle.insert(b, meta(img, a, VolRole::Internal));
        assert_eq!(build_chain(img, &cycle), Err(ChainError::NoLeaf { image: img }));

        let mut loop_plus = cycle.clone();
        loop_plus.insert(c, meta(img, VolUuid::nil(), VolRole::Leaf));
        assert!(matches!(
            build_chain(img, &loop_plus),
            Err(ChainError::Disconnected { .. })
        ));
        assert_eq!(build_chain(img, &BTreeMap::new()), Err(ChainError::Empty(img)));
    }

    #[test]
    fn role_problems_are_reported() {
        let img = ImgUuid::new_random();
        let (a, b) = (VolUuid::new_random(), VolUuid::new_random());
        let mut vols = BTreeMap::new();
        vols.insert(a, meta(img, VolUuid::nil(), VolRole::Leaf));
        let mut top = meta(img, a, VolRole::Leaf);
        top.legality = Legality::Illegal;
        vols.insert(b, top);
        let p = build_chain(img, &vols).unwrap().problems();
        assert!(p.contains(&RoleProblem::Role {
            vol: a,
            found: VolRole::Leaf,
            expected: VolRole::Internal
        }));
        assert!(p.contains(&RoleProblem::Illegal { vol: b }));
    }
}
