//! Tags: oVirt's tree of labels under the root tag, put on VMs, hosts and templates.
//!
//! Invariants: names are unique (the database enforces it too, should two adds race); the
//! root tag (`ROOT_TAG_ID`, named `root`) is never stored, changed, removed or put on
//! anything; a tag is never moved under itself or one of its descendants; removing a tag
//! removes its descendants and every assignment of them.

use std::collections::HashMap;

use crate::model::{Tag, TagId, TagTarget, ROOT_TAG_ID, ROOT_TAG_NAME};

use super::{CommandError, Commands};

/// A change to a tag; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct UpdateTag {
    pub name: Option<String>,
    pub description: Option<String>,
    /// `ROOT_TAG_ID`: directly under the root.
    pub parent: Option<TagId>,
}

/// The root tag, as the API shows it.
pub fn root_tag() -> Tag {
    Tag {
        id: ROOT_TAG_ID,
        name: ROOT_TAG_NAME.into(),
        description: ROOT_TAG_NAME.into(),
        parent: None,
        created_at: crate::time::Timestamp::from_millis(0),
    }
}

/// Whether `candidate` is `tag` or lies under it, by the parent links in `parents`.
fn in_subtree(parents: &HashMap<TagId, Option<TagId>>, tag: TagId, candidate: TagId) -> bool {
    let mut at = Some(candidate);
    // Bounded by the number of tags: a corrupt cycle cannot loop for ever.
    for _ in 0..=parents.len() {
        match at {
            Some(t) if t == tag => return true,
            Some(t) => at = parents.get(&t).copied().flatten(),
            None => return false,
        }
    }
    false
}

impl Commands {
    /// A stored tag (the root is not one).
    async fn stored_tag(&self, id: TagId, doing: &str) -> Result<Tag, CommandError> {
        if id == ROOT_TAG_ID {
            return Err(CommandError::Conflict(format!("the root tag cannot be {doing}")));
        }
        self.app
            .db
            .tag_get(id)
            .await?
            .ok_or_else(|| CommandError::not_found("tag", id))
    }

    /// `parent` as stored: `None` for the root; an unknown tag is an error.
    async fn tag_parent(&self, parent: Option<TagId>) -> Result<Option<TagId>, CommandError> {
        match parent {
            None => Ok(None),
            Some(p) if p == ROOT_TAG_ID => Ok(None),
            Some(p) => Ok(Some(self.stored_tag(p, "a parent").await?.id)),
        }
    }

    fn check_tag_name(name: &str) -> Result<(), CommandError> {
        if name.eq_ignore_ascii_case(ROOT_TAG_NAME) {
            return Err(CommandError::Conflict(format!("{name:?} is the root tag's name")));
        }
        Ok(())
    }

    pub async fn add_tag(
        &self,
        name: &str,
        description: &str,
        parent: Option<TagId>,
    ) -> Result<Tag, CommandError> {
        Self::check_tag_name(name)?;
        if self.app.db.tag_get_by_name(name).await?.is_some() {
            return Err(CommandError::Conflict(format!("a tag named {name} exists")));
        }
        let t = Tag {
            id: TagId::new_random(),
            name: name.to_string(),
            description: description.to_string(),
            parent: self.tag_parent(parent).await?,
            created_at: self.app.db.now(),
        };
        Ok(self.app.db.tag_insert(&t).await?)
    }

    pub async fn update_tag(&self, id: TagId, req: UpdateTag) -> Result<Tag, CommandError> {
        let mut t = self.stored_tag(id, "changed").await?;
        if let Some(n) = req.name.filter(|n| *n != t.name) {
            Self::check_tag_name(&n)?;
            if self.app.db.tag_get_by_name(&n).await?.is_some() {
                return Err(CommandError::Conflict(format!("a tag named {n} exists")));
            }
            t.name = n;
        }
        if let Some(d) = req.description {
            t.description = d;
        }
        if req.parent.is_some() {
            let parent = self.tag_parent(req.parent).await?;
            if let Some(p) = parent {
                let parents: HashMap<TagId, Option<TagId>> = self
                    .app
                    .db
                    .tag_list()
                    .await?
                    .into_iter()
                    .map(|t| (t.id, t.parent))
                    .collect();
                if in_subtree(&parents, id, p) {
                    return Err(CommandError::invalid(format!(
                        "tag {} cannot move under itself or one of its own tags",
                        t.name
                    )));
                }
            }
            t.parent = parent;
        }
        Ok(self.app.db.tag_update(&t).await?)
    }

    /// Removes a tag with the tags under it; they come off everything they were on.
    pub async fn remove_tag(&self, id: TagId) -> Result<(), CommandError> {
        self.stored_tag(id, "removed").await?;
        Ok(self.app.db.tag_delete(id).await?)
    }

    /// Puts a tag on a VM, host or template (which must exist); twice is a conflict.
    pub async fn assign_tag(&self, tag: TagId, on: TagTarget) -> Result<Tag, CommandError> {
        let t = self.stored_tag(tag, "put on anything").await?;
        let (kind, what, found) = match on {
            TagTarget::Vm(v) => ("VM", v.to_string(), self.app.db.vm_get(v).await?.is_some()),
            TagTarget::Host(h) => ("host", h.to_string(), self.app.db.host_get(h).await?.is_some()),
            TagTarget::Template(x) => (
                "template",
                x.to_string(),
                self.app.db.template_get(x).await?.is_some(),
            ),
        };
        if !found {
            return Err(CommandError::NotFound { kind, id: what });
        }
        if self.app.db.tags_of(on).await?.iter().any(|x| x.id == tag) {
            return Err(CommandError::Conflict(format!("tag {} is on it already", t.name)));
        }
        self.app.db.tag_assign(tag, on).await?;
        Ok(t)
    }

    pub async fn unassign_tag(&self, tag: TagId, on: TagTarget) -> Result<(), CommandError> {
        if !self.app.db.tag_unassign(tag, on).await? {
            return Err(CommandError::NotFound {
                kind: "tag",
                id: format!("{tag} on it"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_is_in_its_own_subtree_and_its_descendants_are() {
        let (a, b, c, d) = (
            TagId::new_random(),
            TagId::new_random(),
            TagId::new_random(),
            TagId::new_random(),
        );
        // a ─ b ─ c ; d alone
        let parents = HashMap::from([(a, None), (b, Some(a)), (c, Some(b)), (d, None)]);
        assert!(in_subtree(&parents, a, a));
        assert!(in_subtree(&parents, a, c), "a grandchild");
        assert!(!in_subtree(&parents, c, a), "an ancestor is not under it");
        assert!(!in_subtree(&parents, a, d));
        // A cycle in bad data ends.
        let bad = HashMap::from([(a, Some(b)), (b, Some(a))]);
        assert!(!in_subtree(&bad, c, a));
    }
}
